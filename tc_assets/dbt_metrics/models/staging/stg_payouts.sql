-- Classic payouts; payout_return = payout / stake (null without a stake).
select
    round,
    model_id,
    stake,
    corr,
    tc,
    corr_multiplier,
    tc_multiplier,
    payout_factor,
    score,
    payout,
    clipped,
    case when stake > 0 then payout / stake end as payout_return
from {{ source('warehouse', 'payouts') }}
