%% @doc Reads and validates the `trust_dist' application environment: the one place
%% where configuration is interpreted. Every error names the key, the value and the fix.
%%
%% Runs at VM boot inside `net_sup', before `file_server_2' or `user' exist: it uses only
%% `application:load/1' and `get_env', and leaves file contents to the NIF.
-module(trust_dist_config).

-export([load/0, format_error/1]).

-type config() :: #{identity := string(),
                    certificate := string(),
                    authorities := [string()],
                    tiers := [atom()],
                    listen := #{ip := inet:ip_address() | any, port := inet:port_number()},
                    ports := #{node() => inet:port_number()},
                    revoked := string(),
                    policy := [{binary(), map()}],
                    assertions := [{binary(), boolean(), binary(), [binary()], non_neg_integer()}],
                    busy_poll_us := non_neg_integer()}.
-export_type([config/0]).

-define(KNOWN_KEYS, [identity, certificate, authorities, tiers, listen, ports, policy, assertions,
                     revoked, busy_poll_us]).
%% How long the transport thread waits for the next packet before it sleeps, by default
%% and at most (microseconds); 0 turns the wait off, as `+sbwt none' does for schedulers.
-define(BUSY_POLL_US, 50).
%% The most stays under QUIC's 2 ms acknowledgement delay: timers wait for the wait.
-define(MAX_BUSY_POLL_US, 1000).
%% Options of one tier's policy; what they mean is in the README's policy reference.
-define(POLICY_OPTIONS, [registered, rpc, max_message_size, funs, connect, audit,
                         max_monitors, max_depth]).

%% @doc The validated configuration, or `{error, {Key, Message}}'.
-spec load() -> {ok, config()} | {error, {atom(), string()}}.
load() ->
    %% Outside a release the application is not loaded at boot, and get_env would not
    %% see sys.config (see the boot notes in the protocol reference).
    _ = application:load(trust_dist),
    try
        Env = application:get_all_env(trust_dist),
        [throw({Key, "unknown key; known keys are " ++ keys_text()})
         || {Key, _} <- Env, not lists:member(Key, ?KNOWN_KEYS), Key =/= included_applications],
        Tiers = tiers(required(tiers)),
        {ok, #{identity => path(identity, required(identity)),
               certificate => path(certificate, required(certificate)),
               authorities => authorities(required(authorities)),
               tiers => Tiers,
               listen => listen(get(listen, #{})),
               ports => ports(get(ports, #{})),
               revoked => case get(revoked, undefined) of
                              undefined -> "";
                              Path -> path(revoked, Path)
                          end,
               policy => policy(get(policy, #{}), Tiers),
               assertions => assertions(get(assertions, []), Tiers),
               busy_poll_us => busy_poll_us(get(busy_poll_us, ?BUSY_POLL_US))}}
    catch
        throw:{Key, Message} -> {error, {Key, Message}}
    end.

%% @doc A one-line, human-readable form of a configuration error.
-spec format_error({atom(), string()}) -> string().
format_error({Key, Message}) ->
    lists:flatten(io_lib:format("trust_dist configuration key '~ts': ~ts", [Key, Message])).

keys_text() ->
    lists:join(", ", [atom_to_list(K) || K <- ?KNOWN_KEYS]).

get(Key, Default) ->
    application:get_env(trust_dist, Key, Default).

required(Key) ->
    case application:get_env(trust_dist, Key) of
        {ok, Value} -> {Key, Value};
        undefined ->
            throw({Key, "is missing; add it to the trust_dist section of sys.config "
                        "(bin/trust-dist dev-cluster writes a complete example)"})
    end.

path(Key, {Key, Value}) -> path(Key, Value);
path(Key, Value) ->
    case is_text(Value) of
        true -> text(Value);
        false -> throw({Key, fmt("must be a file path string, got ~tp", [Value])})
    end.

authorities({Key, Paths}) when is_list(Paths), Paths =/= [] ->
    case is_text(Paths) of
        true -> [path(Key, Paths)];  % a single path given as a string
        false -> [path(Key, P) || P <- Paths]
    end;
authorities({Key, Other}) ->
    throw({Key, fmt("must be a non-empty list of public key files, got ~tp", [Other])}).

tiers({Key, Tiers}) when is_list(Tiers), Tiers =/= [] ->
    [throw({Key, fmt("~tp is not a tier name: use lowercase atoms such as admin, worker, edge", [T])})
     || T <- Tiers, not is_tier(T)],
    case length(lists:usort(Tiers)) =:= length(Tiers) of
        true -> Tiers;
        false -> throw({Key, fmt("lists a tier twice: ~tp", [Tiers])})
    end;
tiers({Key, Other}) ->
    throw({Key, fmt("must be a non-empty list of tier names, highest first "
                    "(for example [admin, worker, edge]), got ~tp", [Other])}).

is_tier(T) when is_atom(T) ->
    case atom_to_list(T) of
        [C | Rest] when C >= $a, C =< $z ->
            lists:all(fun(X) -> (X >= $a andalso X =< $z) orelse (X >= $0 andalso X =< $9)
                                    orelse X =:= $_ end, Rest);
        _ -> false
    end;
is_tier(_) -> false.

listen(Map) when is_map(Map) ->
    [throw({listen, fmt("unknown option ~tp; known options are ip and port", [K])})
     || K <- maps:keys(Map), not lists:member(K, [ip, port])],
    Ip = case maps:get(ip, Map, any) of
             any -> any;
             Ip0 when is_tuple(Ip0) ->
                 case inet:ntoa(Ip0) of
                     {error, _} -> throw({listen, fmt("ip ~tp is not an IP address tuple", [Ip0])});
                     _ -> Ip0
                 end;
             Ip0 ->
                 case is_text(Ip0) andalso inet:parse_address(text(Ip0)) of
                     {ok, Parsed} -> Parsed;
                     _ -> throw({listen, fmt("ip ~tp is not an IP address", [Ip0])})
                 end
         end,
    Port = case maps:get(port, Map, 0) of
               P when is_integer(P), P >= 0, P =< 65535 -> P;
               P -> throw({listen, fmt("port ~tp is not a UDP port number (0..65535; 0 = any)", [P])})
           end,
    #{ip => Ip, port => Port};
listen(Other) ->
    throw({listen, fmt("must be a map such as #{port => 4370}, got ~tp", [Other])}).

ports(Map) when is_map(Map) ->
    maps:foreach(
      fun(Node, Port) when is_atom(Node), is_integer(Port), Port > 0, Port =< 65535 -> ok;
         (Node, Port) -> throw({ports, fmt("entry ~tp => ~tp must map a node name atom to a UDP port",
                                          [Node, Port])})
      end, Map),
    Map;
ports(Other) ->
    throw({ports, fmt("must be a map of node name to UDP port, got ~tp", [Other])}).

busy_poll_us(Us) when is_integer(Us), Us >= 0, Us =< ?MAX_BUSY_POLL_US -> Us;
busy_poll_us(Other) ->
    throw({busy_poll_us, fmt("must be an integer from 0 (off) to ~b microseconds, got ~tp",
                             [?MAX_BUSY_POLL_US, Other])}).

%% The policy goes to the NIF with names as binaries and only the options given; the
%% filter fills in the defaults ("answer only").
policy(Map, Tiers) when is_map(Map) ->
    [{atom_to_binary(tier_of(policy, Tier, Tiers)), tier_policy(Tier, Options)}
     || {Tier, Options} <- lists:sort(maps:to_list(Map))];
policy(Other, _Tiers) ->
    throw({policy, fmt("must be a map of tier => options, such as "
                       "#{worker => #{registered => [results]}}, got ~tp", [Other])}).

tier_of(Key, Tier, Tiers) ->
    case lists:member(Tier, Tiers) of
        true -> Tier;
        false -> throw({Key, fmt("names tier ~tp, which is not in tiers ~tp", [Tier, Tiers])})
    end.

tier_policy(Tier, Options) when is_map(Options) ->
    maps:from_list([tier_option(Tier, K, V) || {K, V} <- maps:to_list(Options)]);
tier_policy(Tier, Other) ->
    throw({policy, fmt("tier ~tp: options must be a map such as #{registered => [results]}, got ~tp",
                       [Tier, Other])}).

tier_option(Tier, registered, Names) ->
    case is_list(Names) andalso lists:all(fun is_atom/1, Names) of
        true -> {registered, [atom_to_binary(N) || N <- Names]};
        false -> throw({policy, fmt("tier ~tp: registered must be a list of registered names "
                                    "(atoms), got ~tp", [Tier, Names])})
    end;
tier_option(Tier, rpc, MFAs) ->
    Valid = fun({M, F, A}) -> is_atom(M) andalso is_atom(F) andalso is_integer(A)
                                  andalso A >= 0 andalso A =< 255;
               (_) -> false
            end,
    case is_list(MFAs) andalso lists:all(Valid, MFAs) of
        true -> {rpc, [{atom_to_binary(M), atom_to_binary(F), A} || {M, F, A} <- MFAs]};
        false -> throw({policy, fmt("tier ~tp: rpc must be a list of {Module, Function, Arity}, "
                                    "got ~tp", [Tier, MFAs])})
    end;
tier_option(Tier, K, V) when K =:= max_message_size; K =:= max_monitors; K =:= max_depth ->
    case is_integer(V) andalso V > 0 of
        true -> {K, V};
        false -> throw({policy, fmt("tier ~tp: ~ts must be a positive integer, got ~tp", [Tier, K, V])})
    end;
tier_option(Tier, K, V) when K =:= funs; K =:= connect; K =:= audit ->
    case is_boolean(V) of
        true -> {K, V};
        false -> throw({policy, fmt("tier ~tp: ~ts must be true or false, got ~tp", [Tier, K, V])})
    end;
tier_option(Tier, K, _V) ->
    throw({policy, fmt("tier ~tp: unknown option ~tp; known options are ~ts",
                       [Tier, K, lists:join(", ", [atom_to_list(O) || O <- ?POLICY_OPTIONS])])}).

%% Assertions are checked by the filter itself when the carrier starts; here only their
%% form.
assertions(List, Tiers) when is_list(List) ->
    [assertion(A, Tiers) || A <- List];
assertions(Other, _Tiers) ->
    throw({assertions, fmt("must be a list such as [{worker, may_not, spawn}], got ~tp", [Other])}).

assertion({Tier, Modal, What} = A, Tiers) when Modal =:= may; Modal =:= may_not ->
    T = atom_to_binary(tier_of(assertions, Tier, Tiers)),
    May = Modal =:= may,
    case What of
        _ when What =:= spawn; What =:= connect; What =:= exit; What =:= link;
               What =:= group_leader; What =:= funs ->
            {T, May, atom_to_binary(What), [], 0};
        {call, M, F, Ar} when is_atom(M), is_atom(F), is_integer(Ar), Ar >= 0, Ar =< 255 ->
            {T, May, <<"call">>, [atom_to_binary(M), atom_to_binary(F)], Ar};
        {Kind, Name} when (Kind =:= send orelse Kind =:= monitor), is_atom(Name) ->
            {T, May, atom_to_binary(Kind), [atom_to_binary(Name)], 0};
        {message_size, N} when is_integer(N), N > 0 ->
            {T, May, <<"message_size">>, [], N};
        _ ->
            throw({assertions, fmt("~tp: unknown capability ~tp; use spawn, {call, M, F, A}, "
                                   "{send, Name}, {monitor, Name}, connect, exit, link, "
                                   "group_leader, funs or {message_size, Bytes}", [A, What])})
    end;
assertion(Other, _Tiers) ->
    throw({assertions, fmt("~tp is not an assertion; write {Tier, may | may_not, Capability}",
                           [Other])}).

is_text(V) when is_binary(V) -> true;
is_text(V) when is_list(V) -> io_lib:char_list(V) andalso V =/= [];
is_text(_) -> false.

text(V) when is_binary(V) -> unicode:characters_to_list(V);
text(V) -> V.

fmt(Format, Args) ->
    lists:flatten(io_lib:format(Format, Args)).
