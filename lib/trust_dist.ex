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
  `:ticks_in`, `:ticks_out`, `:tail_probes`, `:copies_out`, `:copies_used`, `:dropped_in`,
  `:writes_in_place`, `:sent_in_place` and `:queued`. Restricted
  links (the peer's tier is below ours) also carry the filter's `:counters`
  (`%{op => %{outcome => n}}`) and `:denied`; full links report them empty.

      iex> TrustDist.links()
      [%{node: :"b@127.0.0.1", tier: "worker", mode: :restricted, ...}]
  """
  @spec links() :: [map()]
  def links, do: :trust_dist.links()

  @doc """
  Reads the revocation list (the `revoked` key of the `trust_dist` config) again and
  disconnects every connected peer it now revokes. The file is also watched, so an edit
  takes effect within a second without this call.
  """
  @spec reload_revocations() :: {:ok, non_neg_integer()} | {:error, String.t()}
  def reload_revocations do
    case :trust_dist.reload_revocations() do
      {:ok, n} -> {:ok, n}
      {:error, why} -> {:error, List.to_string(why)}
    end
  end
end
