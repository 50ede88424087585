select round, model_id, corr, mmc, fnc_v3, fnc_v3_tb200, max_feature_exposure
from {{ source('warehouse', 'model_metrics') }}
