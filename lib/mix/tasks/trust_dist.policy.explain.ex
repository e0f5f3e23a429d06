defmodule Mix.Tasks.TrustDist.Policy.Explain do
  @shortdoc "Explains what a tier may do to a node"

  @moduledoc """
  Explains what a tier may do to a node: `bin/trust-dist policy explain` with the same arguments.

      mix trust_dist.policy.explain CONFIG --peer-tier TIER

  Run `mix trust_dist.policy.explain --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(policy explain) ++ args)
end
