"""What each participant of a provisioned federation reads: READMEs, node configs and
the exact commands to copy.

The coordinator's README (start the SuperLink, admit the hospitals, submit a run), each
hospital's README (check the data, start the SuperNode), the `flwr supernode register`
lines, and the `--node-config` string a ClientApp reads. Every command a human copies
carries the offline environment of `server/ops/processes.py`.
"""

from __future__ import annotations

import shlex
from collections.abc import Sequence

from server.ops.pki import PUBKEYS_DIR
from server.ops.processes import FLOWER_ENV
from shared_model.contract.run_config import DEFAULT_NODE_EPSILON_BUDGET

CONNECTION_NAME = "medfuse"  # the [superlink.NAME] entry in the coordinator's config.toml
REGISTER_TXT = "register-supernodes.txt"
README = "README.txt"


def env_prefix() -> str:
    return " ".join(f"{k}={v}" for k, v in FLOWER_ENV.items())


def node_config_string(
    data_path: str,
    site_name: str,
    device: str = "auto",
    epsilon_budget: float | None = DEFAULT_NODE_EPSILON_BUDGET,
    state_dir: str | None = None,
    release_compute_time: bool = False,
) -> str:
    """The `--node-config` value the ClientApp reads (TOML values, strings quoted).
    `release_compute_time`: the node sends how long each message took, without DP (a
    rehearsal or a benchmark on one's own machines, never a hospital's default).

    Flower splits the string on spaces outside quotes and has no escapes inside them, so a
    string is double-quoted, or single-quoted (TOML literal) when it holds `"` or `\\`.
    """

    def q(s: str) -> str:
        if '"' not in s and "\\" not in s:
            return f'"{s}"'
        if "'" not in s:
            return f"'{s}'"
        raise ValueError(f"{s!r}: a node-config value cannot hold both ' and \"")

    parts = [
        f"data-path={q(data_path)}",
        f"site-name={q(site_name)}",
        f"device={q(device)}",
    ]
    if epsilon_budget is not None:  # None: the node's own default (8), lowered by a run
        parts.append(f"epsilon-budget={float(epsilon_budget)!r}")
    if state_dir is not None:
        parts.append(f"state-dir={q(state_dir)}")
    if release_compute_time:
        parts.append("release-compute-time=true")
    return " ".join(parts)


def register_command(pubkey: str, hospital: str, connection: str = CONNECTION_NAME) -> str:
    return (
        f"{env_prefix()} flwr supernode register {shlex.quote(pubkey)} {connection}"
        f" --name {shlex.quote(hospital)}"
    )


def register_script(hospitals: Sequence[str]) -> str:
    """The coordinator's register-supernodes.txt: one register command per hospital."""
    regs = "".join(register_command(f"{PUBKEYS_DIR}/{n}.pub", n) + "\n" for n in hospitals)
    return ("# run from this folder, with the SuperLink up "
            f"and a [superlink.{CONNECTION_NAME}] entry in $FLWR_HOME/config.toml\n" + regs)


def _superlink_address(hosts: Sequence[str], port: int) -> str:
    host = hosts[0] if hosts else "127.0.0.1"
    return f"[{host}]:{port}" if ":" in host else f"{host}:{port}"


def coordinator_readme(
    hospitals: Sequence[str], hosts: Sequence[str], port: int, bind_host: str
) -> str:
    address = _superlink_address(hosts, port)
    regs = "\n".join(
        f"  flwr supernode register {PUBKEYS_DIR}/{shlex.quote(h)}.pub {CONNECTION_NAME}"
        f" --name {shlex.quote(h)}"
        for h in hospitals
    )
    exports = env_prefix()
    return f"""medfuse coordinator: what this folder is for
=============================================

Files: ca.crt (the federation's CA certificate), superlink.crt / superlink.key (the
SuperLink's TLS identity, key readable by you only), {PUBKEYS_DIR}/ (each hospital's
PUBLIC key), {REGISTER_TXT} (the commands that admit them). The CA's private key is
NOT here: it stays in the provisioning folder's ca/ (keep it offline).

0. In every shell that runs a Flower command (no telemetry, no update check):

  export {exports}

1. Start the SuperLink from this folder (TLS, node authentication, a state database):

  flower-superlink \\
      --ssl-ca-certfile ca.crt --ssl-certfile superlink.crt --ssl-keyfile superlink.key \\
      --enable-supernode-auth --database superlink.db \\
      --disable-runtime-dependency-installation \\
      --host {bind_host} --port {port}

   Open TCP port {port} to the hospitals (and to whoever runs `flwr`). Nothing else.

2. Tell the flwr CLI where the SuperLink is, in a Flower home of your own (not ~/.flwr,
   which flwr also uses for its local simulation SuperLink). From this folder, paste
   these lines as they are ($PWD makes root-certificates the absolute path flwr needs):

export FLWR_HOME=$PWD/flwr-home
mkdir -p $FLWR_HOME && cat > $FLWR_HOME/config.toml <<EOF
[superlink]
default = "{CONNECTION_NAME}"

[superlink.{CONNECTION_NAME}]
address = "{address}"
root-certificates = "$PWD/ca.crt"
EOF

   Keep FLWR_HOME exported in every shell that runs flwr (steps 3 to 5).

3. Admit the hospitals, from this folder (once; the node id stays with the key):

{regs}

   Who is connected:  flwr supernode list {CONNECTION_NAME}

4. Submit the app from the medfuse project folder and follow it:

  flwr run . {CONNECTION_NAME} --stream -c "num-server-rounds=10 output-dir='/srv/medfuse/fed1'"

   Runs and their status:  flwr ls {CONNECTION_NAME}
   Results, checkpoints and the final model are written by the ServerApp under
   output-dir on this machine (results.jsonl, checkpoints/, final/).

5. After a SuperLink restart (same --database) the running run is marked failed.
   Continue it from its last checkpoint: the same command plus resume=true:

  flwr run . {CONNECTION_NAME} --stream \\
      -c "num-server-rounds=10 output-dir='/srv/medfuse/fed1' resume=true"

See docs/deployment.md in the medfuse repository for the whole procedure.
"""


def hospital_readme(name: str, hosts: Sequence[str], port: int, epsilon_budget: float) -> str:
    address = _superlink_address(hosts, port)
    node_cfg = node_config_string("$DATA_PATH", name, "auto", epsilon_budget, "$STATE_DIR")
    # double-quoted for the shell so that $DATA_PATH and $STATE_DIR expand
    shell_cfg = '"' + node_cfg.replace('"', '\\"') + '"'
    state_dir = f"$HOME/.medfuse/state/{name}"  # the node's ledger; `privacy show` reads it
    title = f'medfuse hospital "{name}": what this folder is for'
    return f"""{title}
{'=' * len(title)}

Files: ca.crt (verifies the coordinator's SuperLink), supernode.key (YOUR private key:
readable by you only, never send it anywhere), supernode.pub (your public key; the
coordinator already has a copy and registers it). No other participant's private key
is in this folder.

1. Check your data first (a site folder in medfuse dataset format v1):

  medfuse data check /path/to/your/site

2. Start the SuperNode from this folder (only outgoing TCP to {address} is needed;
   the --port below is local to this machine, for the ClientApp processes):

  DATA_PATH=/path/to/your/site
  STATE_DIR={state_dir}
  {env_prefix()} flower-supernode \\
      --superlink {address} \\
      --root-certificates ca.crt \\
      --auth-supernode-private-key supernode.key \\
      --node-config {shell_cfg} \\
      --port 9094

   data-path: your site folder. device: auto, cpu, cuda or cuda:N.
   epsilon-budget: your privacy budget for everything ever trained on this data (it
   may be lower than the federation's, never higher). state-dir: where your privacy
   ledger lives; keep it across restarts, it is what stops the budget from resetting.

3. See what has been spent and what is left, any time (the same state-dir as above):

  medfuse privacy show --state-dir {state_dir}

Nothing leaves this machine but model weight updates and scalar metrics.
"""
