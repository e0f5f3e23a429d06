-module(hello_rel_sup).
-behaviour(supervisor).
-export([start_link/0, init/1]).

start_link() ->
    supervisor:start_link({local, ?MODULE}, ?MODULE, []).

init([]) ->
    {ok, {#{strategy => one_for_one},
          [#{id => hello_greeter, start => {hello_greeter, start_link, []}}]}}.
