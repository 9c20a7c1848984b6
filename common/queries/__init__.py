"""Named SQL, one module per table; services never write SQL inline."""

#: Channel on which the scheduler is woken (new requests, a worker registered, capacity freed).
WAKE_CHANNEL = "baton_wake"

#: The cheapest round trip: is the database there?
PING = "SELECT 1"

#: Channel on which workers hear that one of their runs was cancelled (the payload is its id; the
#: worker reads the row before acting on it).
CONTROL_CHANNEL = "baton_control"

#: Channel on which the executor's timer loop hears that a run was suspended with a wake-up time.
TIMER_CHANNEL = "baton_timer"
