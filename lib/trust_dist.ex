defmodule TrustDist do
  @moduledoc """
  Elixir face of the `trust_dist` distribution carrier.

  The carrier itself is the Erlang module `:trust_dist`, selected with
  `-proto_dist trust`; this module only gives its introspection an Elixir name.
  """

  @doc """
  Lists the established links of this node.

  Each link is a map with the peer `:node`, the name or pattern its certificate is for
  (`:certified_as`), its `:tier`, the `:fingerprint` of its key, the link `:mode`
  (`:full` or `:restricted`), its `:address`, certificate `:serial`, `:not_after` and
  `:issuer`, and the counters `:bytes_in`, `:bytes_out`, `:packets_in`, `:packets_out`,
  `:ticks_in`, `:ticks_out`, `:dropped_in` and `:queued`.

      iex> TrustDist.links()
      [%{node: :"b@127.0.0.1", tier: "worker", mode: :restricted, ...}]
  """
  @spec links() :: [map()]
  def links, do: :trust_dist.links()
end
