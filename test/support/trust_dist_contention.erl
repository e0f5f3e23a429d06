%% Workloads of test/contention_test.exs (`make contention`), run on the nodes under test:
%% sequential round trips to an echo, and an endless 1 MiB bulk sender.
-module(trust_dist_contention).
-export([pings/2, bulk/2, stop/1]).

%% Round trips to a fresh echo on Remote for Ms milliseconds, after 20 to warm up.
%% Returns #{n, p50_us, p99_us, max_us}.
pings(Remote, Ms) ->
    Echo = spawn(Remote, fun Echo() ->
                                 receive
                                     {ping, From} -> From ! pong, Echo();
                                     stop -> ok
                                 end
                         end),
    _ = [round_trip(Echo) || _ <- lists:seq(1, 20)],
    Deadline = erlang:monotonic_time(millisecond) + Ms,
    Samples = lists:sort(collect(Echo, Deadline, [])),
    Echo ! stop,
    N = length(Samples),
    #{n => N,
      p50_us => lists:nth(max(1, N div 2), Samples),
      p99_us => lists:nth(max(1, N * 99 div 100), Samples),
      max_us => lists:last(Samples)}.

collect(Echo, Deadline, Acc) ->
    case erlang:monotonic_time(millisecond) < Deadline of
        true -> collect(Echo, Deadline, [round_trip(Echo) | Acc]);
        false -> Acc
    end.

round_trip(Echo) ->
    T0 = erlang:monotonic_time(microsecond),
    Echo ! {ping, self()},
    receive pong -> erlang:monotonic_time(microsecond) - T0 end.

%% Streams Size-byte binaries to a sink on Remote as fast as the link takes them, until
%% stop/1, which returns what the sink received, in MB/s.
bulk(Remote, Size) ->
    Sink = spawn(Remote, fun() -> sink(erlang:monotonic_time(microsecond), 0) end),
    Bin = crypto:strong_rand_bytes(Size),
    {spawn(fun Send() -> Sink ! Bin, Send() end), Sink}.

sink(Started, Bytes) ->
    receive
        {stop, From} ->
            Elapsed = max(1, erlang:monotonic_time(microsecond) - Started),
            From ! {received, Bytes / Elapsed};
        Bin ->
            sink(Started, Bytes + byte_size(Bin))
    end.

stop({Sender, Sink}) ->
    exit(Sender, kill),
    Sink ! {stop, self()},
    receive {received, MBps} -> MBps after 10000 -> timeout end.
