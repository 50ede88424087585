{#- Every row's `columns` (e.g. round, model_id) exist together in a row of `to`: a foreign
    key over several columns, which dbt's single-column `relationships` cannot say. -#}
{% test composite_relationships(model, to, columns) %}
select child.*
from {{ model }} as child
where not exists (
    select 1 from {{ to }} as parent
    where {% for c in columns %}parent.{{ c }} = child.{{ c }}{% if not loop.last %} and {% endif %}{% endfor %}
)
{% endtest %}
