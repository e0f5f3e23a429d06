defmodule Mix.Tasks.TrustDist.Cert.Verify do
  @shortdoc "Verifies a certificate against an authority"

  @moduledoc """
  Verifies a certificate against an authority: `bin/trust-dist cert verify` with the same arguments.

      mix trust_dist.cert.verify FILE --authority DIR

  Run `mix trust_dist.cert.verify --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(cert verify) ++ args)
end
