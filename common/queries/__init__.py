"""Named SQL, one module per table; services never write SQL inline."""

#: Channel on which the scheduler is woken (new requests, a worker registered, capacity freed).
WAKE_CHANNEL = "baton_wake"

#: The cheapest round trip: is the database there?
PING = "SELECT 1"
