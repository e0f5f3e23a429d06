defmodule Mix.Tasks.TrustDist.Node.Rotate do
  @shortdoc "Gives a node a new key and certificate, keeping the old ones"

  @moduledoc """
  Gives a node a new key and certificate, keeping the old ones: `bin/trust-dist node rotate` with the same arguments.

      mix trust_dist.node.rotate NAME@HOST --authority DIR --out OUT [--valid-days N] [--force]

  Run `mix trust_dist.node.rotate --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(node rotate) ++ args)
end
