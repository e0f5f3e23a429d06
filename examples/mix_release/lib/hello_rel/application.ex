defmodule HelloRel.Application do
  @moduledoc false
  use Application

  @impl true
  def start(_type, _args) do
    Supervisor.start_link([HelloRel.Greeter], strategy: :one_for_one, name: HelloRel.Supervisor)
  end
end
