-- Per round and portfolio-weight submission: its scores, payout and Sharpe contribution, and
-- its ranks in the round by payout percentage and by marginal return to the fund (1 = best).
with scores as (
    select * from {{ ref('stg_portfolio_scores') }}
    where {{ round_filter() }}
)

select
    p.round,
    p.model_id,
    p.stake,
    p.pb,
    p.pr,
    p.meta_loss_basis,
    p.meta_lost,
    p.transaction_cost,
    p.pp,
    p.scenario,
    p.marginal_return,
    p.payout,
    p.payout_return,
    p.capacity_usd,
    s.sharpe_contribution,
    s.rounds_submitted as sharpe_rounds,
    r.clip,
    rank() over (partition by p.round order by p.pp desc nulls last) as pp_rank,
    rank() over (partition by p.round order by p.marginal_return desc nulls last)
        as marginal_return_rank,
    count(*) over (partition by p.round) as models_ranked
from scores as p
inner join {{ ref('stg_rounds') }} as r on r.round = p.round
left join {{ ref('stg_sharpe_contribution') }} as s
    on s.round = p.round and s.model_id = p.model_id
