%% A registered gen_server other nodes call over the carrier:
%% hello_greeter:hello(Node) -> {hello, [{from, Node}, {count, N}]}.
-module(hello_greeter).
-behaviour(gen_server).
-export([start_link/0, hello/1]).
-export([init/1, handle_call/3, handle_cast/2]).

start_link() ->
    gen_server:start_link({local, ?MODULE}, ?MODULE, 0, []).

hello(Node) ->
    gen_server:call({?MODULE, Node}, {hello, node()}).

init(Count) ->
    {ok, Count}.

handle_call({hello, _From}, _Caller, Count) ->
    {reply, {hello, [{from, node()}, {count, Count + 1}]}, Count + 1}.

handle_cast(_Msg, Count) ->
    {noreply, Count}.
