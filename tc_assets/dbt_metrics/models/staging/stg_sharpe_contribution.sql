select round, model_id, window_rounds, rounds_submitted, sharpe_contribution
from {{ source('warehouse', 'sharpe_contribution') }}
