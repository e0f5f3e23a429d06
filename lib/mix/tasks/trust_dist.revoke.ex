defmodule Mix.Tasks.TrustDist.Revoke do
  @shortdoc "Adds a key or certificate to a revocation list"

  @moduledoc """
  Adds a key or certificate to a revocation list: `bin/trust-dist revoke` with the same arguments.

      mix trust_dist.revoke LIST (--key SHA256:... | --cert FILE | --serial ISSUER SERIAL) [--comment TEXT]

  Run `mix trust_dist.revoke --help` for the options and exit codes. See
  `Mix.Tasks.TrustDist` for how the executable is found.
  """
  use Mix.Task

  @impl true
  def run(args), do: Mix.Tasks.TrustDist.run_cli(~w(revoke) ++ args)
end
