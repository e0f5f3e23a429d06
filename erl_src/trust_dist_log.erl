%% @doc The carrier's log lines: `logger' events under the domain [trust_dist], so a
%% deployment can route or filter them.
%%
%% OTP's default handler drops events of any domain but [otp, sasl] unless told
%% otherwise, which would hide refused connections from operators. So the first time we
%% log once that handler is installed (it replaces the boot-time handler after
%% distribution has started), we add a filter to it that shows our domain.
-module(trust_dist_log).

-export([log/3, denied/1]).

-spec log(logger:level(), io:format(), [term()]) -> ok.
log(Level, Format, Args) ->
    ensure_shown(),
    logger:log(Level, "trust_dist: " ++ Format, Args, #{domain => [trust_dist]}).

%% @doc A refused packet from a lower tier, as a structured report: `what', `peer',
%% `tier', `op', `reason', `outcome' (dropped, answered, closed, or audited: delivered
%% in audit mode), `detail' and `suppressed' (refusals on that link not reported since
%% the last report; the transport limits reports per link and second).
-spec denied(map()) -> ok.
denied(#{peer := Peer, tier := Tier, op := Op, reason := Reason, outcome := Outcome} = Raw) ->
    ensure_shown(),
    Report = Raw#{what => trust_dist_denied,
                  peer => binary_to_atom(Peer),
                  tier => binary_to_atom(Tier),
                  op => binary_to_atom(Op),
                  reason => binary_to_atom(Reason),
                  outcome => binary_to_atom(Outcome)},
    Level = case Outcome of <<"audited">> -> notice; _ -> warning end,
    logger:log(Level, Report, #{domain => [trust_dist], report_cb => fun format_denied/1}),
    trust_dist_telemetry:emit([denied], #{count => 1, suppressed => maps:get(suppressed, Report, 0)},
                              maps:with([peer, tier, op, reason, outcome, detail], Report)).

format_denied(#{peer := Peer, tier := Tier, op := Op, reason := Reason, outcome := Outcome,
                detail := Detail, suppressed := Suppressed}) ->
    More = case Suppressed of
               0 -> "";
               N -> io_lib:format("; ~b earlier refusals not logged", [N])
           end,
    {"trust_dist: refused ~ts from ~ts (tier ~ts): ~ts (~ts), ~ts~ts",
     [Op, Peer, Tier, Reason, Detail, Outcome, More]}.

ensure_shown() ->
    case persistent_term:get(?MODULE, false) of
        true -> ok;
        false ->
            case logger:get_handler_config(default) of
                {ok, #{module := logger_std_h, filters := Filters}} ->
                    case lists:keymember(trust_dist, 1, Filters) of
                        true -> ok;
                        false ->
                            Filter = {fun logger_filters:domain/2, {log, sub, [trust_dist]}},
                            _ = logger:add_handler_filter(default, trust_dist, Filter)
                    end,
                    persistent_term:put(?MODULE, true);
                {ok, _} ->
                    %% Another kind of default handler (Elixir's Logger, for one) decides
                    %% for itself.
                    persistent_term:put(?MODULE, true);
                {error, _} ->
                    %% Still booting: the boot-time handler; try again next time.
                    ok
            end
    end.
