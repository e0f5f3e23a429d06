%% The application side of `make demo': a gen_server registered as `results' on every
%% node, which collects what other nodes report to it. It is what the desktop's policy
%% exposes to the lower tiers: the name `results' (messages, monitors, GenServer.call) and
%% the one function `demo_results:report/1' (through erpc/rpc).
-module(demo_results).
-behaviour(gen_server).

-export([start/0, report/1, reset/0, seen/0]).
-export([init/1, handle_call/3, handle_cast/2, handle_info/2]).

%% Starts the `results' server, unlinked: it must outlive the process that started it.
start() ->
    case whereis(results) of
        undefined -> {ok, Pid} = gen_server:start({local, results}, ?MODULE, [], []), Pid;
        Pid -> Pid
    end.

%% The allowlisted entry point: a lower tier may run exactly this through erpc.
report(Result) ->
    {reported, node(), gen_server:call(results, {report, Result})}.

%% Not allowlisted: same module, another function.
reset() ->
    gen_server:call(results, reset).

%% Everything `results' holds, oldest first.
seen() ->
    gen_server:call(results, seen).

init([]) ->
    {ok, []}.

handle_call({report, Result}, _From, Seen) ->
    {reply, length(Seen) + 1, [{report, Result} | Seen]};
handle_call(count, _From, Seen) ->
    {reply, {count, node(), length(Seen)}, Seen};
handle_call(seen, _From, Seen) ->
    {reply, lists:reverse(Seen), Seen};
handle_call(reset, _From, _Seen) ->
    {reply, ok, []}.

handle_cast(_Msg, Seen) ->
    {noreply, Seen}.

handle_info(Msg, Seen) ->
    {noreply, [{info, Msg} | Seen]}.
