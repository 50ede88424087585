-- The optimized meta portfolio: mb bucketed (target) return, mr raw return, net of its cost.
select round, mb, mr, transaction_cost, net_return
from {{ source('warehouse', 'meta_portfolio_returns') }}
