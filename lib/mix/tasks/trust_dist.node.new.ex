defmodule Mix.Tasks.TrustDist.Node.New do
  @shortdoc "Creates a node key and certificate"

  @moduledoc """
  Creates a node key and certificate: `bin/trust-dist node new` with the same arguments.

      mix trust_dist.node.new NAME@HOST --tier TIER --authority DIR --out OUT [--valid-days N] [--force]

  Run `mix trust_dist.node.new --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(node new) ++ args)
end
