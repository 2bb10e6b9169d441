"""Coordinator tooling: the commands around the ServerApp, not the ServerApp itself.

Keys for a federation (`provision`: `pki`, `handouts`), the public start (`pretrain`), a
real federation on one machine (`deploy local`: `deploy`, `federation`), the Flower
processes they start (`supervisor`, `processes`, `flower_commands`), the live page of a
run (`dashboard`) and the `medfuse` commands of the coordinator (`cli`). The federated
learning itself (ServerApp, strategies, checks, checkpoints, results) is `server/`.
"""
