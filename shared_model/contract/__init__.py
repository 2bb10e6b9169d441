"""The run contract: what the coordinator and the hospitals agree on before any round.

- `run_config`: the run's typed settings, the same table on every node;
- `wire`: every message key and reply code that crosses the network;
- `packing`, `compression`: how a message's arrays travel (one packed array, 16-bit updates);
- `metric_registry`: every metric by name, with how it is released under DP and shown;
- `validation`: the one way a bad value becomes a message naming the key.

Nothing here trains or touches data: a change here changes what both sides accept.
"""
