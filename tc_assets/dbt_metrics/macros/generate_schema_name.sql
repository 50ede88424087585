{#- Models land in the schema they configure (`staging`, `reporting`), not `main_staging`:
    the warehouse's own tables stay alone in `main`. -#}
{% macro generate_schema_name(custom_schema_name, node) -%}
    {{ (custom_schema_name or target.schema) | trim }}
{%- endmacro %}
