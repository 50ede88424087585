-- One row per round: submissions, stakes, payouts, the meta portfolio's return, and how TC
-- relates to the proxy metrics across the round's models (Pearson correlations).
with rounds as (
    select * from {{ ref('stg_rounds') }}
    where {{ round_filter() }}
),

submitted as (
    select
        round,
        count(distinct model_id) as models_submitted,
        count(*) filter (where kind = 'prediction') as prediction_submissions,
        count(*) filter (where kind = 'portfolio') as portfolio_submissions
    from {{ ref('stg_submissions') }}
    group by round
),

rejected as (
    select round, count(distinct model_id) as models_rejected,
        count(*) as submissions_rejected
    from {{ ref('stg_submission_rejections') }}
    group by round
),

staked as (
    select round, count(*) filter (where stake > 0) as models_staked,
        sum(stake) as total_stake
    from {{ ref('stg_stakes') }}
    group by round
),

paid as (
    select round, count(*) as models_paid, sum(payout) as total_payout
    from {{ ref('stg_payouts') }}
    group by round
),

scored as (
    select
        t.round,
        count(*) as models_scored,
        corr(t.tc, m.corr) as tc_vs_corr,
        corr(t.tc, m.fnc_v3) as tc_vs_fnc_v3,
        corr(t.tc, m.mmc) as tc_vs_mmc
    from {{ ref('stg_tc_scores') }} as t
    inner join {{ ref('stg_model_metrics') }} as m
        on m.round = t.round and m.model_id = t.model_id
    group by t.round
)

select
    r.round,
    r.is_resolved,
    coalesce(sub.models_submitted, 0) as models_submitted,
    coalesce(sub.prediction_submissions, 0) as prediction_submissions,
    coalesce(sub.portfolio_submissions, 0) as portfolio_submissions,
    coalesce(rej.models_rejected, 0) as models_rejected,
    coalesce(rej.submissions_rejected, 0) as submissions_rejected,
    coalesce(st.models_staked, 0) as models_staked,
    coalesce(st.total_stake, 0) as total_stake,
    ps.payout_factor,
    pd.models_paid,
    pd.total_payout,
    mp.mb as meta_bucketed_return,
    mp.mr as meta_return,
    mp.net_return as meta_net_return,
    sc.models_scored,
    sc.tc_vs_corr,
    sc.tc_vs_fnc_v3,
    sc.tc_vs_mmc
from rounds as r
left join submitted as sub on sub.round = r.round
left join rejected as rej on rej.round = r.round
left join staked as st on st.round = r.round
left join paid as pd on pd.round = r.round
left join {{ ref('stg_payout_summary') }} as ps on ps.round = r.round
left join {{ ref('stg_meta_portfolio_returns') }} as mp on mp.round = r.round
left join scored as sc on sc.round = r.round
