defmodule Mix.Tasks.Compile.TrustDistNative do
  @moduledoc """
  Builds the Rust crates (release profile) with cargo and places the NIF in
  `priv/native/` and the CLI in `bin/`. Needs only cargo; no Hex package.
  """
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    root = Path.expand(".", __DIR__)

    {_, status} =
      System.cmd(
        "cargo",
        ["build", "--release", "--quiet", "-p", "trust_dist_nif", "-p", "trust_dist_cli"],
        cd: root,
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true
      )

    if status != 0 do
      Mix.raise("cargo build failed (exit #{status})")
    end

    target = System.get_env("CARGO_TARGET_DIR", Path.join(root, "target"))
    File.mkdir_p!(Path.join(root, "priv/native"))
    File.mkdir_p!(Path.join(root, "bin"))

    install(
      Path.join(target, "release/libtrust_dist_nif.so"),
      Path.join(root, "priv/native/trust_dist_nif.so")
    )

    install(Path.join(target, "release/trust-dist"), Path.join(root, "bin/trust-dist"))
    {:ok, []}
  end

  # Copy through a temporary name so a running VM that has the old library loaded keeps
  # a valid mapping.
  defp install(from, to) do
    tmp = to <> ".tmp"
    File.cp!(from, tmp)
    File.rename!(tmp, to)
  end
end

defmodule TrustDist.MixProject do
  use Mix.Project

  def project do
    [
      app: :trust_dist,
      version: "0.1.0",
      elixir: "~> 1.14",
      erlc_paths: erlc_paths(Mix.env()),
      compilers: [:trust_dist_native] ++ Mix.compilers(),
      start_permanent: false,
      deps: [],
      test_paths: ["test"],
      elixirc_paths: elixirc_paths(Mix.env())
    ]
  end

  # Test support runs on the nodes under test (Erlang, so it needs no Elixir there) and
  # in the test runner (Elixir).
  defp erlc_paths(:test), do: ["erl_src", "test/support"]
  defp erlc_paths(_), do: ["erl_src"]
  defp elixirc_paths(:test), do: ["lib", "test/support"]
  defp elixirc_paths(_), do: ["lib"]

  def application do
    [extra_applications: [:logger]]
  end
end
