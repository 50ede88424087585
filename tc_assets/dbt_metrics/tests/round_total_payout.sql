-- Business rule: a round's total payout is the sum of its models' payouts, in the leaderboard
-- and in the payouts asset's own summary. Returns the rounds where either differs.
{{ config(meta={'dagster': {'ref': {'name': 'round_summary'}}}) }}

with board as (
    select round, sum(payout) as payout from {{ ref('round_leaderboard') }} group by round
)

select s.round, s.total_payout, b.payout as leaderboard_payout, p.total_payout as summary_payout
from {{ ref('round_summary') }} as s
left join board as b on b.round = s.round
left join {{ source('warehouse', 'payout_summary') }} as p on p.round = s.round
where s.total_payout is not null
  and (
    b.payout is null or p.total_payout is null
    or abs(s.total_payout - b.payout) > 1e-6 * (1 + abs(s.total_payout))
    or abs(s.total_payout - p.total_payout) > 1e-6 * (1 + abs(s.total_payout))
  )
