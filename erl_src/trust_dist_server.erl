%% @doc Owns the node's QUIC carrier: loads the configuration and the NIF when
%% distribution starts, binds the endpoint when `net_kernel' listens, turns transport log
%% lines into `logger' reports and keeps the table of established links.
%%
%% Started from {@link trust_dist:childspecs/0} under `net_sup', so it lives exactly as
%% long as distribution does.
-module(trust_dist_server).
-behaviour(gen_server).

-export([start_link/0, listen/2, carrier/0, config/0, register_link/4, links/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2, terminate/2]).

-define(TABLE, trust_dist_links).

%% What a connection runs, loaded when the carrier starts.
-define(CONNECTION_MODULES, [trust_dist_link, trust_dist_telemetry, dist_util, string,
                             unicode_util]).

-record(state, {config :: trust_dist_config:config(),
                carrier = undefined :: undefined | reference()}).

start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, [], []).

%% @doc Binds the QUIC endpoint for node `NodeName' on `Port' (0 = any).
-spec listen(string(), inet:port_number()) ->
          {ok, reference(), inet:port_number(), inet:ip_address()} | {error, term()}.
listen(NodeName, Port) ->
    gen_server:call(?MODULE, {listen, NodeName, Port}, infinity).

%% @doc The running carrier (a NIF resource).
carrier() ->
    persistent_term:get({?MODULE, carrier}).

config() ->
    persistent_term:get({?MODULE, config}).

%% @doc Records an established link so {@link links/0} can list it until `Ctrl' exits.
register_link(Node, Ctrl, Link, Info) ->
    gen_server:cast(?MODULE, {register_link, Node, Ctrl, Link, Info}).

%% @doc `[{Node, Link, Info}]' for every established link, the newest first: while a
%% link that just ended is still being torn down, the one that replaced it comes first.
links() ->
    try ets:tab2list(?TABLE) of
        Rows -> [{Node, Link, Info}
                 || {_Ctrl, Node, Link, Info, _Since} <- lists:reverse(lists:keysort(5, Rows))]
    catch
        error:badarg -> []
    end.

init([]) ->
    process_flag(trap_exit, true),
    case trust_dist_config:load() of
        {ok, Config} ->
            case trust_dist_nif:load() of
                ok ->
                    persistent_term:put({?MODULE, config}, Config),
                    _ = ets:new(?TABLE, [named_table, protected, set]),
                    {ok, #state{config = Config}};
                {error, Reason} ->
                    stop_boot({nif, Reason}, "cannot load the trust_dist NIF: ~tp "
                              "(was the project built? `make build` puts it in priv/native)",
                              [Reason])
            end;
        {error, {Key, _} = Error} ->
            stop_boot({bad_trust_dist_config, Key, trust_dist_config:format_error(Error)},
                      "~ts", [trust_dist_config:format_error(Error)])
    end.

%% A failure here stops distribution, and at boot the whole node: say why on stderr too,
%% since logger may not get to flush before the VM halts.
stop_boot(Reason, Format, Args) ->
    Text = lists:flatten(io_lib:format(Format, Args)),
    logger:error(Text, #{domain => [trust_dist]}),
    erlang:display_string("trust_dist: " ++ Text ++ "\n"),
    {stop, Reason}.

handle_call({listen, NodeName, Port}, _From, #state{config = Config} = State) ->
    #{listen := #{ip := Ip0}} = Config,
    Ip = case Ip0 of any -> {0, 0, 0, 0, 0, 0, 0, 0}; _ -> Ip0 end,
    Options = #{identity => bin(maps:get(identity, Config)),
                certificate => bin(maps:get(certificate, Config)),
                authorities => [bin(A) || A <- maps:get(authorities, Config)],
                tiers => [atom_to_binary(T) || T <- maps:get(tiers, Config)],
                node_name => bin(NodeName),
                ip => bin(inet:ntoa(Ip)),
                port => Port,
                log => self(),
                revoked => bin(maps:get(revoked, Config)),
                idle_timeout_ms => net_ticktime_ms(),
                handshake_timeout_ms => net_setuptime_ms(),
                %% Without fragments a message is one packet, however large (as over
                %% inet_tcp_dist without fragments, up to its 4-byte length); a
                %% restricted link holds its peer to the policy's max_message_size.
                max_frame => 16#FFFFFFFF,
                busy_poll_us => maps:get(busy_poll_us, Config)},
    Trust = {maps:get(policy, Config), maps:get(assertions, Config)},
    case start_carrier(Options, Trust, Ip0) of
        {ok, Carrier, BoundIp} ->
            persistent_term:put({?MODULE, carrier}, Carrier),
            _ = trust_dist_nif:vocabulary(),
            %% The code a connection runs, loaded now rather than by the first connection
            %% (an interactive node loads modules on first call; a few ms each).
            _ = [code:ensure_loaded(M) || M <- ?CONNECTION_MODULES],
            {reply, {ok, Carrier, trust_dist_nif:local_port(Carrier), BoundIp},
             State#state{carrier = Carrier}};
        {error, {Key, Why}} = Error ->
            Text = trust_dist_config:format_error({Key, Why}),
            logger:error(Text, #{domain => [trust_dist]}),
            erlang:display_string("trust_dist: " ++ Text ++ "\n"),
            {reply, Error, State}
    end.

%% With no configured address, bind the IPv6 wildcard (which also serves IPv4 where the
%% host allows dual stack), and fall back to the IPv4 wildcard on hosts without IPv6.
start_carrier(Options, {Policy, Assertions}, any) ->
    case trust_dist_nif:start(Options, Policy, Assertions) of
        {ok, Carrier} -> {ok, Carrier, {0, 0, 0, 0, 0, 0, 0, 0}};
        {error, {listen, _}} ->
            case trust_dist_nif:start(Options#{ip := <<"0.0.0.0">>}, Policy, Assertions) of
                {ok, Carrier} -> {ok, Carrier, {0, 0, 0, 0}};
                Error -> Error
            end;
        Error -> Error
    end;
start_carrier(Options, {Policy, Assertions}, Ip) ->
    case trust_dist_nif:start(Options, Policy, Assertions) of
        {ok, Carrier} -> {ok, Carrier, Ip};
        Error -> Error
    end.

bin(Text) ->
    unicode:characters_to_binary(Text).

net_ticktime_ms() ->
    case application:get_env(kernel, net_ticktime) of
        {ok, T} when is_integer(T), T > 0 -> T * 1000;
        _ -> 60000
    end.

net_setuptime_ms() ->
    case application:get_env(kernel, net_setuptime) of
        {ok, T} when is_number(T), T > 0 -> min(round(T * 1000), 120000);
        _ -> 7000
    end.

handle_cast({register_link, Node, Ctrl, Link, Info}, State) ->
    _ = erlang:monitor(process, Ctrl),
    ets:insert(?TABLE, {Ctrl, Node, Link, Info, erlang:monotonic_time(millisecond)}),
    trust_dist_telemetry:emit([link, up], #{system_time => erlang:system_time()},
                              (link_metadata(Node, Info))#{fingerprint => maps:get(fingerprint, Info),
                                                            certified_as => maps:get(certified_as, Info)}),
    {noreply, State}.

link_metadata(Node, Info) ->
    #{peer => Node, tier => maps:get(tier, Info), mode => maps:get(mode, Info)}.

link_down(Node, Link, Info, Since, Reason) ->
    Stats = trust_dist_nif:stats(Link),
    Measurements = maps:merge(maps:with([bytes_in, bytes_out, packets_in, packets_out, denied], Stats),
                              #{duration_ms => erlang:monotonic_time(millisecond) - Since}),
    trust_dist_telemetry:emit([link, down], Measurements,
                              (link_metadata(Node, Info))#{reason => Reason}).

handle_info({trust_dist_denied, Report}, State) ->
    trust_dist_log:denied(Report),
    {noreply, State};
handle_info({trust_dist_log, Level, Message}, State) ->
    trust_dist_log:log(Level, "~ts", [Message]),
    {noreply, State};
handle_info({'DOWN', _, process, Ctrl, Reason}, State) ->
    case ets:take(?TABLE, Ctrl) of
        [{Ctrl, Node, Link, Info, Since}] -> link_down(Node, Link, Info, Since, Reason);
        [] -> ok
    end,
    {noreply, State};
handle_info(_Other, State) ->
    {noreply, State}.

terminate(_Reason, #state{carrier = undefined}) ->
    ok;
terminate(_Reason, #state{carrier = Carrier}) ->
    _ = persistent_term:erase({?MODULE, carrier}),
    trust_dist_nif:stop(Carrier).
