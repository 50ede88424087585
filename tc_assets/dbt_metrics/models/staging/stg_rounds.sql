-- One row per ingested round: calendar, payout parameters, and whether it has resolved.
select
    r.round,
    r.open_time,
    r.close_time,
    r.resolve_time,
    r.stake_threshold,
    r.clip,
    r.n_ids,
    r.ingested_at,
    r.round in (select distinct v.round from {{ source('warehouse', 'resolved') }} as v) as is_resolved
from {{ source('warehouse', 'rounds') }} as r
