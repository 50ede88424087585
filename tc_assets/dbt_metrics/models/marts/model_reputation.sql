-- Per round R and model: rolling means over the last var('reputation_window') resolved rounds
-- up to R (R included when resolved) of corr, tc, fnc_v3 and payout return (payout / stake,
-- staked rounds only), each with the number of rounds behind it. A model missing from a
-- round of the window has fewer rounds behind its figures; window_rounds counts the window.
-- A run for round R rebuilds R and every later round: their windows may look back over R, so
-- re-scoring (or first scoring) an earlier round never leaves later reputations stale.
{%- set window = var('reputation_window') | int %}
{%- if window < 1 %}
    {{ exceptions.raise_compiler_error("var reputation_window must be >= 1, got " ~ window) }}
{%- endif %}

with as_of as (
    select round as as_of_round
    from {{ ref('stg_rounds') }}
    where {{ round_filter(op='>=') }}
),

windows as (
    select a.as_of_round, r.round
    from as_of as a
    inner join {{ ref('stg_rounds') }} as r
        on r.is_resolved and r.round <= a.as_of_round
    qualify row_number() over (partition by a.as_of_round order by r.round desc) <= {{ window }}
),

bounds as (
    select as_of_round, count(*) as window_rounds, min(round) as first_round,
        max(round) as last_round
    from windows
    group by as_of_round
),

facts as (
    select
        round,
        model_id,
        m.corr,
        m.fnc_v3,
        t.tc,
        p.payout_return
    from {{ ref('stg_model_metrics') }} as m
    full join {{ ref('stg_tc_scores') }} as t using (round, model_id)
    full join {{ ref('stg_payouts') }} as p using (round, model_id)
),

rolled as (
    select
        w.as_of_round as round,
        f.model_id,
        avg(f.corr) as corr_mean,
        count(f.corr) as corr_rounds,
        avg(f.tc) as tc_mean,
        count(f.tc) as tc_rounds,
        avg(f.fnc_v3) as fnc_v3_mean,
        count(f.fnc_v3) as fnc_v3_rounds,
        avg(f.payout_return) as payout_return_mean,
        count(f.payout_return) as payout_rounds
    from windows as w
    inner join facts as f on f.round = w.round
    group by w.as_of_round, f.model_id
)

select
    r.round,
    r.model_id,
    b.window_rounds,
    b.first_round,
    b.last_round,
    r.corr_mean,
    r.corr_rounds,
    r.tc_mean,
    r.tc_rounds,
    r.fnc_v3_mean,
    r.fnc_v3_rounds,
    r.payout_return_mean,
    r.payout_rounds,
    rank() over (partition by r.round order by r.tc_mean desc nulls last) as tc_rank
from rolled as r
inner join bounds as b on b.as_of_round = r.round
