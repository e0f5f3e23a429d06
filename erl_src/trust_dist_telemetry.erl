%% @doc A bridge to `:telemetry', without depending on it: when the `telemetry' module
%% is loaded (its application running), the carrier's events are emitted through
%% `telemetry:execute/3'; when it is not, emitting costs one BIF call and nothing else.
%%
%% Events (all prefixed with `trust_dist'):
%% <ul>
%% <li>`[trust_dist, link, up]': measurements `#{system_time}'; metadata `#{peer, tier,
%%     mode, fingerprint, certified_as}'.</li>
%% <li>`[trust_dist, link, down]': measurements `#{duration_ms, bytes_in, bytes_out,
%%     packets_in, packets_out, denied}'; metadata `#{peer, tier, mode, reason}'.</li>
%% <li>`[trust_dist, denied]': a packet of a lower tier refused (or audited); measurements
%%     `#{count => 1, suppressed}'; metadata `#{peer, tier, op, reason, outcome,
%%     detail}'. Like the log reports, these are limited to 10 per link and second; the
%%     count of the others is `suppressed', and all of them are in `trust_dist:links()'.</li>
%% </ul>
-module(trust_dist_telemetry).

-export([emit/3]).

-spec emit([atom()], map(), map()) -> ok.
emit(Event, Measurements, Metadata) ->
    case erlang:function_exported(telemetry, execute, 3) of
        true ->
            %% A handler's crash is telemetry's business (it detaches the handler); the
            %% carrier's own processes must not be taken down by it either way.
            try telemetry:execute([trust_dist | Event], Measurements, Metadata)
            catch _:_ -> ok
            end,
            ok;
        false ->
            ok
    end.
