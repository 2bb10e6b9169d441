"""How soon a process asks again for a message's object that is not there yet.

Flower 1.42 shows a message before its objects have arrived: a SuperNode stores a
message, and its ClientApp may start, before it has pulled the message's arrays from the
SuperLink (`flwr/supernode/start_client_internal.py`, `_pull_and_store_message`); the
SuperLink hands the ServerApp a reply as soon as the SuperNode has pushed the message,
before its arrays. Whoever asks too early is told the object is unavailable and waits
1 s, doubling up to 10 s (`flwr/supercore/inflatable/inflatable_utils.py`,
`pull_objects`), for an object that comes 0.1-0.3 s later: in `medfuse deploy local`
a ClientApp's pull of the model took 1.0-1.3 s a round, 0.07-0.28 s with `prompt`.

`prompt` gives one of Flower's pull functions a first wait of `FIRST_WAIT_S`, doubling
up to `LONGEST_WAIT_S`, and no cap on the number of tries; Flower's cap on the time
(2 hours) stays. A retry is one small call on the same machine's Runtime API
(ClientApp) or to the SuperLink (ServerApp).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

FIRST_WAIT_S = 0.02
LONGEST_WAIT_S = 0.25


def prompt(pull: Callable[..., Any]) -> Callable[..., Any]:
    """Flower's `pull_objects` or `pull_and_inflate_object_from_tree`, asking again
    after `FIRST_WAIT_S`, doubling up to `LONGEST_WAIT_S`, as long as Flower's time cap
    allows."""
    return functools.partial(pull, initial_backoff=FIRST_WAIT_S, backoff_cap=LONGEST_WAIT_S,
                             max_tries_per_object=None)
