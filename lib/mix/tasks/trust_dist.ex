defmodule Mix.Tasks.TrustDist do
  @shortdoc "Runs bin/trust-dist with the given arguments"

  @moduledoc """
  Runs `bin/trust-dist` (keys, certificates, revocation, configuration checks, local
  deployments) with the arguments given, for example:

      mix trust_dist check config/sys.config --node app@10.0.0.7
      mix trust_dist --help

  The `mix trust_dist.*` tasks are the same commands by name (`mix trust_dist.node.new
  ...` is `bin/trust-dist node new ...`). They are thin wrappers: arguments go to the
  executable unchanged, its output is printed (standard error merged into standard
  output), and `mix` exits with its exit code (0 success, 1 the thing checked is not
  valid, 2 usage or I/O error; see `--help` of each command).

  The executable is built by `mix compile` (it is built first if missing);
  `TRUST_DIST_CLI` names another one.
  """
  use Mix.Task

  @impl true
  def run(args), do: run_cli(args)

  @doc "Runs the CLI with `args`; exits `mix` with its status when that is not 0."
  def run_cli(args) do
    cli = executable()

    {_, status} = System.cmd(cli, args, into: IO.stream(:stdio, :line), stderr_to_stdout: true)

    if status != 0, do: exit({:shutdown, status})
    :ok
  end

  @doc "The path of the `trust-dist` executable, building it if needed."
  def executable do
    case System.get_env("TRUST_DIST_CLI") do
      nil ->
        path = Path.expand("../../../bin/trust-dist", __DIR__)

        unless File.exists?(path) do
          Mix.Task.run("compile")
        end

        unless File.exists?(path) do
          Mix.raise("#{path} is missing; build it with `mix compile` (or `make build`)")
        end

        path

      path ->
        path
    end
  end
end
