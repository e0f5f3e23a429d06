defmodule Mix.Tasks.TrustDist.Cert.Show do
  @shortdoc "Prints a certificate"

  @moduledoc """
  Prints a certificate: `bin/trust-dist cert show` with the same arguments.

      mix trust_dist.cert.show FILE

  Run `mix trust_dist.cert.show --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(cert show) ++ args)
end
