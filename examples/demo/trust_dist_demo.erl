%% The `make demo' scenario, run on the desktop node: it drives a rented server over the
%% trust_dist carrier with ordinary OTP and reports each step. Exits the VM with status 0
%% only if every expectation held.
-module(trust_dist_demo).

-export([serve/0, run/1]).
%% What the server tries against the desktop, run on the server.
-export([try_spawn/1, try_stop_init/1, try_atom_flood/2]).

%% On the server: a registered gen_server-free echo, then wait to be stopped.
serve() ->
    register(results, spawn(fun results/0)),
    receive never -> ok end.

results() ->
    receive {From, Ref, What} -> From ! {Ref, {stored, node(), What}}, results() end.

run([ServerArg]) ->
    Server = list_to_atom(atom_to_list(ServerArg)),
    Steps = [{"connect over QUIC (net_adm:ping)",
              fun() -> pong = net_adm:ping(Server), {ok, "pong"} end},
             {"run code on the server (erpc:call)",
              fun() -> Release = erpc:call(Server, erlang, system_info, [otp_release]),
                       {ok, "server runs OTP " ++ Release} end},
             {"spawn a linked process there and get its exit reason",
              fun() -> process_flag(trap_exit, true),
                       Pid = spawn_link(Server, erlang, exit, [finished_on_server]),
                       receive {'EXIT', Pid, finished_on_server} -> {ok, "EXIT finished_on_server"}
                       after 5000 -> {error, "no EXIT"} end end},
             {"monitor a process on the server",
              fun() -> Pid = spawn(Server, timer, sleep, [100]),
                       Ref = monitor(process, Pid),
                       receive {'DOWN', Ref, process, Pid, normal} -> {ok, "DOWN normal"}
                       after 5000 -> {error, "no DOWN"} end end},
             {"message a registered process and get the answer",
              fun() -> Ref = make_ref(),
                       {results, Server} ! {self(), Ref, job_42},
                       receive {Ref, {stored, Server, job_42}} -> {ok, "stored job_42"}
                       after 5000 -> {error, "no answer"} end end},
             {"send 64 MiB and check it arrived intact",
              fun() -> Bin = binary:copy(crypto:strong_rand_bytes(1024 * 1024), 64),
                       T0 = erlang:monotonic_time(millisecond),
                       Size = erpc:call(Server, erlang, byte_size, [Bin], 60000),
                       Ms = max(1, erlang:monotonic_time(millisecond) - T0),
                       true = Size =:= byte_size(Bin),
                       {ok, io_lib:format("~b MiB in ~b ms", [Size bsr 20, Ms])} end},
             %% The other way: the server is of a lower tier. The desktop has it try
             %% (with code the server already has), and checks the effect did not happen.
             {"server tries to run code on the desktop (erpc:call os:cmd) - refused",
              fun() -> case erpc:call(Server, ?MODULE, try_spawn, [node()]) of
                           {{erpc, notsup}, Ms} ->
                               {ok, io_lib:format("the server's erpc failed with notsup in ~b ms", [Ms])};
                           Other -> {error, io_lib:format("~p", [Other])}
                       end end},
             {"server sends {stop, stop} to the desktop's init - refused",
              fun() -> ok = erpc:call(Server, ?MODULE, try_stop_init, [node()]),
                       timer:sleep(500),
                       case element(1, init:get_status()) of
                           stopping -> {error, "the desktop is stopping"};
                           _ -> {ok, "the desktop is still running"}
                       end end},
             {"server sends 10,000 new atoms to the desktop - refused",
              fun() -> Before = erlang:system_info(atom_count),
                       ok = erpc:call(Server, ?MODULE, try_atom_flood, [node(), 10000]),
                       timer:sleep(500),
                       Grew = erlang:system_info(atom_count) - Before,
                       case Grew of
                           0 -> {ok, "the desktop's atom table did not grow"};
                           _ -> {error, io_lib:format("atom table grew by ~b", [Grew])}
                       end end}],
    io:format("~ntrust_dist demo: ~p (tier admin) drives ~p (tier worker)~n~n", [node(), Server]),
    Results = [step(Name, Fun) || {Name, Fun} <- Steps],
    io:format("~nlinks of ~p:~n", [node()]),
    [begin
         io:format("  ~p  tier=~s mode=~p key=~s  in=~b B/~b pkts  out=~b B/~b pkts  refused=~b~n",
                   [maps:get(node, L), maps:get(tier, L), maps:get(mode, L), maps:get(fingerprint, L),
                    maps:get(bytes_in, L), maps:get(packets_in, L),
                    maps:get(bytes_out, L), maps:get(packets_out, L), maps:get(denied, L)]),
         [io:format("      ~-24s ~p~n", [Op, ByOutcome])
          || {Op, ByOutcome} <- lists:sort(maps:to_list(maps:get(counters, L)))]
     end
     || L <- trust_dist:links()],
    catch erpc:call(Server, init, stop, [], 2000),
    Failed = length([R || R <- Results, R =/= ok]),
    io:format("~n~b steps, ~b failed~n", [length(Results), Failed]),
    halt(if Failed =:= 0 -> 0; true -> 1 end).

try_spawn(Desktop) ->
    T0 = erlang:monotonic_time(millisecond),
    Result = try erpc:call(Desktop, os, cmd, ["id"], 5000) catch error:E -> E end,
    {Result, erlang:monotonic_time(millisecond) - T0}.

try_stop_init(Desktop) ->
    {init, Desktop} ! {stop, stop},
    ok.

try_atom_flood(Desktop, N) ->
    Atoms = [list_to_atom("demo_fresh_" ++ integer_to_list(I)) || I <- lists:seq(1, N)],
    [{init, Desktop} ! {A} || A <- Atoms],
    ok.

step(Name, Fun) ->
    Result = try Fun() catch C:R -> {error, io_lib:format("~p:~p", [C, R])} end,
    case Result of
        {ok, Detail} -> io:format("  ok    ~s: ~s~n", [Name, Detail]), ok;
        {error, Detail} -> io:format("  FAIL  ~s: ~s~n", [Name, Detail]), error
    end.
