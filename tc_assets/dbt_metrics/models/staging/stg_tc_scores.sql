select round, model_id, tc, tc_std, bags
from {{ source('warehouse', 'tc_scores') }}
