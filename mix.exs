defmodule Mix.Tasks.Compile.TrustDistNative do
  @moduledoc """
  Builds the Rust crates (release profile) with cargo and places the NIF in
  `priv/native/` and the CLI in `bin/`. Needs only cargo; no Hex package.
  """
  use Mix.Task.Compiler

  @impl true
  def run(_args) do
    # One build recipe for Mix and rebar3 alike.
    {_, status} =
      System.cmd("sh", [Path.join(__DIR__, "scripts/build-native.sh")],
        into: IO.stream(:stdio, :line),
        stderr_to_stdout: true
      )

    if status != 0, do: Mix.raise("building the native code failed (exit #{status})")
    {:ok, []}
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
