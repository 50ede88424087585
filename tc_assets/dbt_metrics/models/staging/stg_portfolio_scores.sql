-- Portfolio-weight submissions; payout_return = payout / stake (null without a stake).
select
    round,
    model_id,
    stake,
    pb,
    pr,
    meta_loss_basis,
    meta_lost,
    transaction_cost,
    pp,
    scenario,
    marginal_return,
    payout,
    capacity_usd,
    case when stake > 0 then payout / stake end as payout_return
from {{ source('warehouse', 'portfolio_scores') }}
