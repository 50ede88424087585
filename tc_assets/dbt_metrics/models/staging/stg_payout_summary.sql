select round, payout_factor, total_stake, valid_stake, models_paid, total_payout
from {{ source('warehouse', 'payout_summary') }}
