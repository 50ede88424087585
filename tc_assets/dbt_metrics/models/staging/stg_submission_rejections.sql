select round, model_id, kind, rule, reason
from {{ source('warehouse', 'submission_rejections') }}
