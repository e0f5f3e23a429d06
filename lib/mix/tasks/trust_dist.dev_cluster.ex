defmodule Mix.Tasks.TrustDist.DevCluster do
  @shortdoc "Writes a local deployment of several nodes"

  @moduledoc """
  Writes a local deployment of several nodes: `bin/trust-dist dev-cluster` with the same arguments.

      mix trust_dist.dev_cluster DIR NAME@HOST:TIER ... [--tiers a,b] [--force]

  Run `mix trust_dist.dev_cluster --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(dev-cluster) ++ args)
end
