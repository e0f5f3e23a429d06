defmodule HelloRel.MixProject do
  use Mix.Project

  # A tiny release on the trust_dist carrier. See README.md: `MIX_ENV=prod mix release`,
  # then start it with RELEASE_TRUST_DIR pointing at the node's keys.
  def project do
    [
      app: :hello_rel,
      version: "0.1.0",
      elixir: "~> 1.14",
      start_permanent: Mix.env() == :prod,
      deps: [{:trust_dist, path: "../.."}],
      releases: [
        hello_rel: [
          include_executables_for: [:unix],
          # The carrier's NIF and code are part of the release like any other app.
          applications: [trust_dist: :permanent]
        ]
      ]
    ]
  end

  def application do
    [mod: {HelloRel.Application, []}, extra_applications: [:logger]]
  end
end
