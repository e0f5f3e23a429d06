defmodule HelloRel.Greeter do
  @moduledoc """
  A registered GenServer (`:hello_greeter`) that other nodes of the cluster call over the
  trust_dist carrier: `GenServer.call({:hello_greeter, node}, {:hello, node()})`.
  """
  use GenServer

  def start_link(_), do: GenServer.start_link(__MODULE__, 0, name: :hello_greeter)

  @doc "Asks the greeter on `node` to greet us; returns `{:hello, from: node, count: n}`."
  def hello(node), do: GenServer.call({:hello_greeter, node}, {:hello, node()})

  @impl true
  def init(count), do: {:ok, count}

  @impl true
  def handle_call({:hello, _from}, _caller, count) do
    {:reply, {:hello, from: node(), count: count + 1}, count + 1}
  end
end
