"""Named SQL, one module per table; services never write SQL inline."""

#: Channel on which the scheduler is woken (new requests, a worker registered, capacity freed).
WAKE_CHANNEL = "baton_wake"
