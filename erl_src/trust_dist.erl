%% @doc The `-proto_dist trust' carrier: Erlang distribution over QUIC with authenticated
%% ed25519 identities and per-peer trust tiers.
%%
%% Start a node with `erl -proto_dist trust -name a@host -config sys' and the `trust_dist'
%% section of `sys.config' (see README). This module holds the callbacks `net_kernel'
%% calls; the per-connection processes live in {@link trust_dist_link}.
-module(trust_dist).

%% net_kernel callbacks
-export([childspecs/0, listen/1, listen/2, accept/1, accept_connection/5, setup/5,
         close/1, select/1, address/0, address/1, is_node_name/1, setopts/2, getopts/2]).

%% introspection
-export([links/0, reload_revocations/0]).

%% internal
-export([accept_loop/2]).

-include_lib("kernel/include/net_address.hrl").

-define(PROTOCOL, quic).

%% @doc Starts {@link trust_dist_server} (configuration, NIF, carrier) under `net_sup',
%% before `net_kernel' calls {@link listen/2}.
childspecs() ->
    {ok, [#{id => trust_dist_server,
            start => {trust_dist_server, start_link, []},
            restart => permanent,
            shutdown => 5000,
            type => worker,
            modules => [trust_dist_server]}]}.

select(Node) ->
    case split_node(Node) of
        {ok, _Name, Host} -> trust_dist_link:resolve_host(Host) =/= error;
        error -> false
    end.

%% OTP 25 calls address/0 only when not listening; newer releases try address/1 first.
address() ->
    {ok, Host} = inet:gethostname(),
    address(Host).

address(Host) ->
    #net_address{host = Host, protocol = ?PROTOCOL, family = inet}.

is_node_name(Node) ->
    dist_util:is_node_name(Node).

listen(Name) ->
    {ok, Host} = inet:gethostname(),
    listen(Name, Host).

listen(Name, Host) ->
    NodeName = atom_to_list(Name) ++ "@" ++ Host,
    #{listen := #{port := ConfiguredPort}} = trust_dist_server:config(),
    case listen_port(Name, Host, ConfiguredPort) of
        {ok, Port} ->
            case trust_dist_server:listen(NodeName, Port) of
                {ok, Carrier, BoundPort, Ip} ->
                    Address = #net_address{address = {Ip, BoundPort}, host = Host,
                                           protocol = ?PROTOCOL, family = inet},
                    case register_node(Name, BoundPort) of
                        {ok, Creation} -> {ok, {{trust_dist_listen, Carrier}, Address, Creation}};
                        {error, _} = Error -> Error
                    end;
                {error, _} = Error ->
                    Error
            end;
        {error, _} = Error ->
            Error
    end.

%% The configured port wins; otherwise the epmd module may prescribe one (for example
%% -erl_epmd_port); 0 lets the OS pick.
listen_port(_Name, _Host, Port) when Port > 0 ->
    {ok, Port};
listen_port(Name, Host, 0) ->
    Epmd = net_kernel:epmd_module(),
    _ = code:ensure_loaded(Epmd),
    case erlang:function_exported(Epmd, listen_port_please, 2) of
        true -> Epmd:listen_port_please(Name, Host);
        false -> {ok, 0}
    end.

%% EPMD stores the UDP port like any other port, so `name@host' lookups keep working.
%% Without EPMD a negative creation lets net_kernel pick one at random.
register_node(Name, Port) ->
    case no_epmd() of
        true -> {ok, -1};
        false -> (net_kernel:epmd_module()):register_node(Name, Port, inet)
    end.

no_epmd() ->
    init:get_argument(no_epmd) =/= error.

accept({trust_dist_listen, Carrier}) ->
    spawn_opt(?MODULE, accept_loop, [self(), Carrier], [link, {priority, max}]).

%% @private Hands every verified incoming link to net_kernel, one at a time.
accept_loop(Kernel, Carrier) ->
    ok = trust_dist_nif:accept(Carrier, self()),
    accept_loop(Kernel).

accept_loop(Kernel) ->
    receive
        {trust_dist_accepted, Link, Info} ->
            Kernel ! {accept, self(), {trust_dist_link, Link, Info}, inet, ?PROTOCOL},
            receive
                {Kernel, controller, Supervisor} ->
                    %% `closed' is fine here: the supervisor's first request says so.
                    _ = trust_dist_nif:set_owners(Link, Supervisor, Supervisor),
                    Supervisor ! {self(), controller};
                {Kernel, unsupported_protocol} ->
                    trust_dist_nif:close(Link, <<"unsupported protocol">>)
            end;
        {trust_dist_closed, _} ->
            %% A link that closed before its supervisor took it over; the supervisor
            %% learns of it when it asks for the first handshake message.
            ok;
        {trust_dist_hs, _} ->
            %% Never sent here (frames go out only as asked for, and only the supervisor
            %% asks); dropped so this mailbox cannot grow.
            ok
    end,
    accept_loop(Kernel).

accept_connection(Acceptor, {trust_dist_link, _, _} = Link, MyNode, Allowed, SetupTime) ->
    trust_dist_link:accept_connection(self(), Acceptor, Link, MyNode, Allowed, SetupTime).

setup(Node, Type, MyNode, LongOrShortNames, SetupTime) ->
    trust_dist_link:setup(self(), Node, Type, MyNode, LongOrShortNames, SetupTime).

close({trust_dist_listen, _Carrier}) ->
    %% The carrier is stopped when trust_dist_server terminates with net_sup.
    ok.

setopts(_Listen, _Opts) ->
    {error, enotsup}.

getopts(_Listen, _Opts) ->
    {error, enotsup}.

%% @doc Every established link: peer node, its certified name and tier, key fingerprint,
%% link mode, and traffic counters.
-spec links() -> [map()].
links() ->
    [counters_as_atoms(maps:merge(Info#{node => Node}, trust_dist_nif:stats(Link)))
     || {Node, Link, Info} <- trust_dist_server:links()].

%% The filter's counters of a restricted link come as binaries of a fixed vocabulary
%% (operation and outcome names).
counters_as_atoms(#{counters := Counters} = Link) ->
    Link#{counters := maps:from_list(
                        [{binary_to_atom(Op),
                          maps:from_list([{binary_to_atom(O), N} || {O, N} <- maps:to_list(ByOutcome)])}
                         || {Op, ByOutcome} <- maps:to_list(Counters)])};
counters_as_atoms(Link) ->
    %% A full link parses nothing, so it has nothing to count.
    Link#{counters => #{}, denied => 0}.

%% @doc Reads the revocation list (key `revoked') again and disconnects every connected
%% peer it now revokes. The file is also watched: an edit takes effect within a second
%% without this call.
-spec reload_revocations() -> {ok, non_neg_integer()} | {error, string()}.
reload_revocations() ->
    case trust_dist_nif:reload_revocations(trust_dist_server:carrier()) of
        {ok, N} -> {ok, N};
        {error, Why} -> {error, unicode:characters_to_list(Why)}
    end.

%%% Internal

split_node(Node) when is_atom(Node) ->
    case string:split(atom_to_list(Node), "@") of
        [Name, Host] when Name =/= [], Host =/= [] -> {ok, Name, Host};
        _ -> error
    end.
