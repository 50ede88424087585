-- Business rule: the reputation of round R looks back over min(window, resolved rounds <= R)
-- resolved rounds, the last of them the latest resolved round <= R. Returns the rounds where
-- the mart's window differs.
{{ config(meta={'dagster': {'ref': {'name': 'model_reputation'}}}) }}

with expected as (
    select
        a.round,
        least(count(r.round), {{ var('reputation_window') | int }}) as window_rounds,
        max(r.round) as last_round
    from {{ ref('stg_rounds') }} as a
    inner join {{ ref('stg_rounds') }} as r on r.is_resolved and r.round <= a.round
    group by a.round
)

select m.round, m.window_rounds, e.window_rounds as expected_window_rounds
from (select distinct round, window_rounds, last_round from {{ ref('model_reputation') }}) as m
left join expected as e on e.round = m.round
where e.round is null or m.window_rounds != e.window_rounds or m.last_round != e.last_round
