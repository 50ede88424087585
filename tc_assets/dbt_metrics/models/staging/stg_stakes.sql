select round, model_id, stake, corr_multiplier, tc_multiplier, submitted
from {{ source('warehouse', 'stakes') }}
