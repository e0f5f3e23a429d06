defmodule Mix.Tasks.TrustDist.Authority.New do
  @shortdoc "Creates an authority key pair"

  @moduledoc """
  Creates an authority key pair: `bin/trust-dist authority new` with the same arguments.

      mix trust_dist.authority.new DIR [--force]

  Run `mix trust_dist.authority.new --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(authority new) ++ args)
end
