defmodule Mix.Tasks.TrustDist.Check do
  @shortdoc "Checks a node's sys.config offline"

  @moduledoc """
  Checks a node's sys.config offline: `bin/trust-dist check` with the same arguments.

      mix trust_dist.check CONFIG [--node NAME@HOST]

  Run `mix trust_dist.check --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(check) ++ args)
end
