-- Per round and model with a classic payout: its metrics, payout, and its ranks in the round
-- by TC and by payout (1 = best; ties share a rank).
with payouts as (
    select * from {{ ref('stg_payouts') }}
    where {{ round_filter() }}
)

select
    p.round,
    p.model_id,
    p.stake,
    p.corr,
    m.mmc,
    m.fnc_v3,
    p.tc,
    t.tc_std,
    p.corr_multiplier,
    p.tc_multiplier,
    p.score,
    p.payout,
    p.payout_return,
    p.clipped,
    r.clip,
    rank() over (partition by p.round order by p.tc desc nulls last) as tc_rank,
    rank() over (partition by p.round order by p.payout desc) as payout_rank,
    count(*) over (partition by p.round) as models_ranked
from payouts as p
inner join {{ ref('stg_rounds') }} as r on r.round = p.round
left join {{ ref('stg_model_metrics') }} as m on m.round = p.round and m.model_id = p.model_id
left join {{ ref('stg_tc_scores') }} as t on t.round = p.round and t.model_id = p.model_id
