# Build-time configuration: Mix writes it into the release's sys.config, which the VM
# reads before distribution starts, so the carrier sees it. (config/runtime.exs is
# evaluated too late for distribution settings: do not put trust_dist there.)
#
# Everything here is the same on every node and holds no secret. Which key and
# certificate a node uses, and which authorities it trusts, are files on the machine:
# rel/env.sh.eex adds them at start from $RELEASE_TRUST_DIR (see README.md).
import Config

config :trust_dist,
  tiers: [:admin, :worker],
  # UDP port 0: any free port, registered with EPMD like a TCP distribution port.
  listen: %{port: 0},
  # What a worker node may do on an admin node beyond answering: call the greeter.
  policy: %{worker: %{registered: [:hello_greeter]}},
  # Checked when each node starts. Every tier runs this same sys.config, and a node
  # judges its own tier as full distribution, so only assert what holds on every tier
  # (`{:worker, :may_not, :spawn}` would stop the worker nodes: on them, workers are peers).
  assertions: [{:worker, :may, {:send, :hello_greeter}}]

config :logger, level: :info
