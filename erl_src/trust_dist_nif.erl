%% @doc The NIF functions of trust_dist, loaded explicitly by {@link load/0}.
%%
%% There is deliberately no `-on_load': in an embedded release the on_load of preloaded
%% modules is deferred until after distribution has started, so the carrier loads the
%% library itself from `trust_dist_server' at boot.
-module(trust_dist_nif).

-export([load/0]).
-export([start/3, local_port/1, accept/2, connect/5, stop/1,
         set_owners/3, recv_handshake/1, send/2, send_barrier/2, start_data/3, ack/2, tick/1,
         getstat/1, stats/1, peer/1, close/2, system_process_names/0, vocabulary/0,
       reload_revocations/1]).

-nifs([start/3, local_port/1, accept/2, connect/5, stop/1,
       set_owners/3, recv_handshake/1, send/2, send_barrier/2, start_data/3, ack/2, tick/1,
       getstat/1, stats/1, peer/1, close/2, system_process_names/0, vocabulary/0,
       reload_revocations/1]).

-define(NOT_LOADED, erlang:nif_error({not_loaded, ?MODULE})).

%% @doc Loads the shared library from the application's priv dir. Safe to call again.
-spec load() -> ok | {error, term()}.
load() ->
    case erlang:load_nif(library_path(), 0) of
        ok -> ok;
        {error, {reload, _}} -> ok;
        {error, {upgrade, _}} -> ok;
        {error, Reason} -> {error, {load_nif, library_path(), Reason}}
    end.

library_path() ->
    Priv = case code:priv_dir(trust_dist) of
               {error, bad_name} ->
                   %% Not on the code path as an application (a bare -pa of the ebin):
                   %% the priv dir is still the ebin's sibling.
                   filename:join(filename:dirname(filename:dirname(code:which(?MODULE))), "priv");
               Dir ->
                   Dir
           end,
    filename:join([Priv, "native", "trust_dist_nif"]).

start(_Options, _Policy, _Assertions) -> ?NOT_LOADED.
local_port(_Carrier) -> ?NOT_LOADED.
accept(_Carrier, _Acceptor) -> ?NOT_LOADED.
connect(_Carrier, _Ip, _Port, _Node, _Owner) -> ?NOT_LOADED.
stop(_Carrier) -> ?NOT_LOADED.
set_owners(_Link, _Input, _Output) -> ?NOT_LOADED.
recv_handshake(_Link) -> ?NOT_LOADED.
send(_Link, _Packets) -> ?NOT_LOADED.
send_barrier(_Link, _Packets) -> ?NOT_LOADED.
start_data(_Link, _Me, _SystemProcesses) -> ?NOT_LOADED.
ack(_Link, _Bytes) -> ?NOT_LOADED.
tick(_Link) -> ?NOT_LOADED.
getstat(_Link) -> ?NOT_LOADED.
stats(_Link) -> ?NOT_LOADED.
peer(_Link) -> ?NOT_LOADED.
close(_Link, _Reason) -> ?NOT_LOADED.

%% @doc OTP's system processes: never reachable from a lower tier (the filter's list).
-spec system_process_names() -> [atom()].
system_process_names() -> ?NOT_LOADED.

%% @doc The filter's report vocabulary as atoms (creating them once, at start).
-spec vocabulary() -> [atom()].
vocabulary() -> ?NOT_LOADED.

reload_revocations(_Carrier) -> ?NOT_LOADED.
