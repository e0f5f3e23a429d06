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
                    ports := #{node() => inet:port_number()}}.
-export_type([config/0]).

%% `policy' and `revoked' are not accepted yet: a deployment that sets them expects
%% enforcement, and silently ignoring them would fail open.
-define(KNOWN_KEYS, [identity, certificate, authorities, tiers, listen, ports]).

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
        {ok, #{identity => path(identity, required(identity)),
               certificate => path(certificate, required(certificate)),
               authorities => authorities(required(authorities)),
               tiers => tiers(required(tiers)),
               listen => listen(get(listen, #{})),
               ports => ports(get(ports, #{}))}}
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

is_text(V) when is_binary(V) -> true;
is_text(V) when is_list(V) -> io_lib:char_list(V) andalso V =/= [];
is_text(_) -> false.

text(V) when is_binary(V) -> unicode:characters_to_list(V);
text(V) -> V.

fmt(Format, Args) ->
    lists:flatten(io_lib:format(Format, Args)).
