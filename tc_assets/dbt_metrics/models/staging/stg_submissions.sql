-- Accepted submission files: kind is `prediction` or `portfolio`.
select round, model_id, kind, ids_used, coverage
from {{ source('warehouse', 'submissions') }}
